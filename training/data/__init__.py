"""Datasets for the trainers, as uint8 images in the layout the served models take."""
