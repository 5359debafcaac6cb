"""Feature-adaptation methods (DFM's successors: CFA, ReConPatch, SuperSimpleNet): planned, none registered yet."""
