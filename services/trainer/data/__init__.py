"""SFT data: reading example files and generating synthetic sets (no torch here)."""
