"""tokprune.scoring"""
