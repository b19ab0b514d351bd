"""Trained networks under an artifacts root: finding and loading them (`loaders`) and scoring crops with the
CNN fold models (`scorer`). Below both training and inference: both read what training wrote through here."""
