"""The Django project: settings from the environment, URLs mounted by SD_ROLE, the WSGI entry point."""
