"""The lab (``python -m lab``, ``make lab``): a small internet of Linux network
namespaces on one machine, with capped home links and NAT routers, where real
coordinators and nodes run; not part of the distribution. Needs root."""
