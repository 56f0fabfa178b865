
3
	seed-kill"java"
scenarios1ª	
SIGTERM