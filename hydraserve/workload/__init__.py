"""Workloads, their replay against a gateway, the analysis of results, and the simulator's
shared record formats (`records`)."""
