"""fmtune PEFT plugins."""
