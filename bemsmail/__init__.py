"""bemsmail: a mail push relay."""
__version__ = "0.1.0"
