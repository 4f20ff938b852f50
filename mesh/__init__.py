"""P2P mesh fallback (zeroconf discovery, gossip, offline sync): see issue 4."""
