"""A local validator simulator: a population of validators (keys the operator holds, stakes from
the subnet's metagraph), open-loop arrivals, and the scores those validators would give.

  population.py  who sends: validators from the snapshot's dev keys or from a file
  arrivals.py    when: Poisson at a rate, bursts, a compressed diurnal curve (seeded)
  payloads.py    what: each route's requests, and the checks of their answers
  runner.py      sends them, signed as each validator signs, retrying refusals like real ones
  scoring.py     each validator's score in [0, 1], its breakdown, and the verdict
`torchrank-miner simulate` and benchmarks/soak.py drive it. Nothing here runs inside Serve.
"""
