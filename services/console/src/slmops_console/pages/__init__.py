"""One router per resource the console shows."""
