"""tokprune.models"""
