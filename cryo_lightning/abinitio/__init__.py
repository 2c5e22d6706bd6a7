"""Classical ab initio algorithms (pure torch): reconstruction, and later common lines and class averages."""
