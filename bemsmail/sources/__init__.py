"""Where mailbox events come from: the EWS and Graph adapters behind the MailSource port."""
