"""The bilevel search: the functional problem, hypergradient engines, the non-finite guard, one
step over a :class:`~autolora.search.step.Search`, the fit loop and retraining."""
