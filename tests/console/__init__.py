"""The web console, tested in a real browser (a package, so its conftest.py has a name of its own)."""
