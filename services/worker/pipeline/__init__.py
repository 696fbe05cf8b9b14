"""Pipeline execution across worker processes: the stage-0 driver, the other stages' server,
the data-plane wire format and channel, and consolidation back to one worker."""
