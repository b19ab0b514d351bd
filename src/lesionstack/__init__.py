"""lesionstack."""
