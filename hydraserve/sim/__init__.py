"""A discrete-event cluster simulator driving the scheduler's own policy (docs/SIMULATOR.md)."""

from hydraserve.sim.calibration import Calibration, calibrate
from hydraserve.sim.cluster import CLUSTERS, Cluster, Server, ServingTimes, SizeClass, StorageNode
from hydraserve.sim.engine import SimConfig, SimResult, Simulator, simulate
from hydraserve.sim.summary import RunSummary, summarize_run

__all__ = ["CLUSTERS", "Calibration", "Cluster", "RunSummary", "Server", "ServingTimes",
           "SimConfig", "SimResult", "Simulator", "SizeClass", "StorageNode", "calibrate",
           "simulate", "summarize_run"]
