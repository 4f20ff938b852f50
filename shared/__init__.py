"""Code every meshfed process imports: models, data, protocol, crypto and aggregation math.

This package imports none of app/, client/, mesh/ or dashboard/.
"""
