"""The Kivy officer app: a view-model without Kivy imports, and Kivy views."""
