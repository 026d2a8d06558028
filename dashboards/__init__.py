"""Grafana dashboards for chainwatch, generated from dashboards/build.py."""
