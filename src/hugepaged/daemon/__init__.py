"""The daemon: the registry (mm_slot list), the cursor, the budget, the sleeps, the counters."""
