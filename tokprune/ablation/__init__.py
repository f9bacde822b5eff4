"""tokprune.ablation"""
