"""The strategy lab: several strategies compared on the user's own data, and a recommendation.

- :mod:`tunelab.lab.grid` — the grid (base config + named variants), validated, fair by construction;
- :mod:`tunelab.lab.compare` — runs (or continues) every variant into one comparison directory;
- :mod:`tunelab.lab.report` — results.csv, report.md, a self-contained report.html, plots;
- :mod:`tunelab.lab.frontier` — the Pareto front and the recommendation picks.
"""
