"""The operator's web console (`desanet console`): a Flask application in its own process.

It talks to the gateway service only through the service's documented
interfaces: the status file, the control endpoint, the subscribers file and
the usage stream. Those four doors are one module each here (`status_source`,
`control_link`, `subscribers_file`, `history`); the rest never imports the
service's modules.
"""
