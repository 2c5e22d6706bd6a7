"""Classical ab initio algorithms (pure torch): image moments and the method of moments, common
lines and synchronization, class averages, least-squares reconstruction, volume alignment and
quality measures."""
