"""Normalizing-flow methods (CFLOW, FastFlow, CS-Flow, U-Flow): planned, none registered yet."""
