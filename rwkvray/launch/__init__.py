"""Launchers: Ray Train (run), Ray Tune (tune). Ray is imported only here."""
