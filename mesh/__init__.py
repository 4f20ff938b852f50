"""P2P mesh fallback (issue 4). Built so far, each tested on its own:

- wire.py: signed gossip messages (RSA-PSS over a canonical header that pins the payload's sha256),
  verified with a reason for every refusal, replay and staleness checks;
- trust.py: the roster cache and operator-confirmed fingerprints, QR codes of fingerprints;
- discovery.py: zeroconf advertisement/browsing of `_meshfed._tcp.local.`, static peers;
- gossip.py: example-weighted mixing with the server's FedAvg math, random peer choice.

Not built yet: the client's switch to mesh mode and back, the gossip HTTP endpoint and loop, the
offline SQLite store, the server's signed roster, and sync-back with staleness-weighted merging.
"""
