"""End-to-end load tests and the demo: a plan of mailboxes, devices and mail, a driver that carries it out
through the mocks against a deployment, and the report that matches every mail to its pushes."""
