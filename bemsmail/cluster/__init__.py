"""Node membership, mailbox ownership and the bus between the parts of bemsmail."""
