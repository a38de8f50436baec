// A CoreDNS with only the plugins the walt test harness's cluster DNS needs (the full build
// carries dozens of cloud plugins that would only lengthen a cold build). Built by ../build.sh;
// the Corefile it serves is written by tests/src/k8s/dns.rs.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

// The plugins a Corefile may name, in the order CoreDNS chains them (the same relative order as
// the upstream build's plugin.cfg).
func init() {
	dnsserver.Directives = []string{"bind", "ready", "errors", "log", "kubernetes"}
}

func main() {
	coremain.Run()
}
