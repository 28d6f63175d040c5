"""Shaping: plans (desired HTB trees), kernel read-back, diff and apply through pyroute2."""
