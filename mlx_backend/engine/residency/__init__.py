"""Which models are in memory, and what holds the memory budget: one owner, one face (`Residency`)."""
