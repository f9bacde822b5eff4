"""tokprune.adapters"""
