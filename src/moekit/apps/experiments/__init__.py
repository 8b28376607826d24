"""Experiments that check each method against its paper's claims (print a table, write JSON and PNG)."""
