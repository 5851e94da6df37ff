"""The admin dashboard: server-rendered pages (Jinja2) made live with htmx, no build step."""
