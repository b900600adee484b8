"""The strategy lab (issue 10, being built): comparing strategies on the user's own data and recommending one.
So far: :mod:`tunelab.lab.frontier`, the Pareto front and the recommendation picks."""
