"""The train kind: contract (:mod:`adaptkit.train.api`) and runner (:mod:`adaptkit.train.runner`)."""
