"""Deliver: push senders for APNs and FCM, their error tables, and the dispatcher in front of them."""
