"""From gates to a final adapter: rank rules, the PEFT export, and atomic folder writes."""
