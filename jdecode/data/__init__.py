"""Built-in data: prompt sets, the checkable task set and held-out natural text."""
