"""Validated configuration and the cluster config file."""
