package dhcp

import "net"

// Release gives back mac's leases and forgets what the server was told of
// it (a long-lived lab's closed guest): its addresses go back to the pool.
func (s *Server) Release(mac net.HardwareAddr) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.leases, mac.String())
	delete(s.silent, mac.String())
	delete(s.family, mac.String())
}
