"""Thin routes: parse, authorise, call a domain function, shape the answer."""
