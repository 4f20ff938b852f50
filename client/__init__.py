"""The meshfed client process: a local trainer and the node that talks to the server."""
