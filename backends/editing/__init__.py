"""Shared pieces for weight-editing methods (hooks, keys, values, covariance).

Method modules in ``backends/methods`` build on these; nothing here is copied
between methods.
"""
