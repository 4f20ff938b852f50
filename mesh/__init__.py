"""P2P mesh fallback: when the server is unreachable, clients find each other with zeroconf, keep
training and gossiping, and sync what they learned once the server is back (README "Mesh fallback").

- wire.py: signed gossip messages (RSA-PSS over a canonical header that pins the payload's sha256),
  verified with a reason for every refusal, replay and staleness checks;
- trust.py: the server's signed roster and operator-confirmed fingerprints, QR codes of fingerprints;
- discovery.py: zeroconf advertisement/browsing of `_meshfed._tcp.local.`, static peers;
- gossip.py: example-weighted mixing with the server's FedAvg math, random peer choice;
- store.py: the offline contribution in a local SQLite file that survives a restart;
- node.py: the gossip endpoint, the mode switch and the gossip loop, and the signed sync-back.
"""
