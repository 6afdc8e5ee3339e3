"""WSGI entry point: `gunicorn -c config/gunicorn.conf.py app:app`."""

from chestct.serving import create_app

app = create_app()
