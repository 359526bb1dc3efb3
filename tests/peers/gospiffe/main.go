// Command rampart-gospiffe is a small SPIFFE client built on go-spiffe v2,
// the reference Go implementation of the Workload API and of SPIFFE
// authentication. Rampart's tests use it to check that `rampart agent` and
// the Rampart sidecar agree with the reference implementation:
//
//	rampart-gospiffe fetch ENDPOINT OUTDIR
//	    Fetches the X.509 context once. Writes svid.pem (leaf first),
//	    svid.key (PKCS#8) and bundle-<trust domain>.pem per bundle; prints
//	    "svid <SPIFFE ID>" per SVID (default first) and "bundle <trust
//	    domain>" per bundle, sorted.
//	rampart-gospiffe serve [-svid ID] ENDPOINT ADDR ALLOWED_ID
//	    An mTLS echo server with SVIDs from ENDPOINT: authorizes clients by
//	    SPIFFE ID, writes back every line it reads. Prints "listening" once
//	    the socket is bound.
//	rampart-gospiffe dial [-svid ID] ENDPOINT ADDR SERVER_ID MESSAGE
//	    An mTLS client with SVIDs from ENDPOINT: authorizes the server by
//	    SPIFFE ID, sends MESSAGE and a newline, prints the line it gets back.
//
// ENDPOINT is a Workload API address (unix:///path or tcp://IP:port). With
// -svid, the SVID with that SPIFFE ID is used instead of the default one.
// Exits 1 with a message on stderr on any failure.
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

func main() {
	if len(os.Args) < 2 {
		fail("usage: rampart-gospiffe fetch|serve|dial ...")
	}
	flags := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	svidID := flags.String("svid", "", "use the SVID with this SPIFFE ID")
	if err := flags.Parse(os.Args[2:]); err != nil {
		fail(err.Error())
	}
	args := flags.Args()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var err error
	switch {
	case os.Args[1] == "fetch" && len(args) == 2:
		err = fetch(ctx, args[0], args[1])
	case os.Args[1] == "serve" && len(args) == 3:
		err = serve(ctx, args[0], *svidID, args[1], args[2])
	case os.Args[1] == "dial" && len(args) == 4:
		err = dial(ctx, args[0], *svidID, args[1], args[2], args[3])
	default:
		err = fmt.Errorf("bad arguments for %q: %v", os.Args[1], args)
	}
	if err != nil {
		fail(err.Error())
	}
}

func fail(msg string) {
	fmt.Fprintln(os.Stderr, "rampart-gospiffe:", msg)
	os.Exit(1)
}

func fetch(ctx context.Context, endpoint, dir string) error {
	x509ctx, err := workloadapi.FetchX509Context(ctx, workloadapi.WithAddr(endpoint))
	if err != nil {
		return fmt.Errorf("fetch X.509 context: %w", err)
	}
	if len(x509ctx.SVIDs) == 0 {
		return fmt.Errorf("no SVID in the response")
	}
	certs, key, err := x509ctx.DefaultSVID().Marshal()
	if err != nil {
		return fmt.Errorf("marshal SVID: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "svid.pem"), certs, 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "svid.key"), key, 0o600); err != nil {
		return err
	}
	for _, s := range x509ctx.SVIDs {
		fmt.Println("svid", s.ID)
	}
	var tds []string
	for _, b := range x509ctx.Bundles.Bundles() {
		pem, err := b.Marshal()
		if err != nil {
			return fmt.Errorf("marshal bundle of %s: %w", b.TrustDomain(), err)
		}
		name := filepath.Join(dir, "bundle-"+b.TrustDomain().Name()+".pem")
		if err := os.WriteFile(name, pem, 0o644); err != nil {
			return err
		}
		tds = append(tds, b.TrustDomain().Name())
	}
	sort.Strings(tds)
	for _, td := range tds {
		fmt.Println("bundle", td)
	}
	return nil
}

// source is an X509Source on endpoint that serves the SVID named svidID
// (or the default one).
func source(ctx context.Context, endpoint, svidID string) (*workloadapi.X509Source, error) {
	opts := []workloadapi.X509SourceOption{
		workloadapi.WithClientOptions(workloadapi.WithAddr(endpoint)),
	}
	if svidID != "" {
		want, err := spiffeid.FromString(svidID)
		if err != nil {
			return nil, fmt.Errorf("-svid: %w", err)
		}
		opts = append(opts, workloadapi.WithDefaultX509SVIDPicker(func(svids []*x509svid.SVID) *x509svid.SVID {
			for _, s := range svids {
				if s.ID == want {
					return s
				}
			}
			return svids[0]
		}))
	}
	src, err := workloadapi.NewX509Source(ctx, opts...)
	if err != nil {
		return nil, fmt.Errorf("X.509 source: %w", err)
	}
	return src, nil
}

func serve(ctx context.Context, endpoint, svidID, addr, allowed string) error {
	peer, err := spiffeid.FromString(allowed)
	if err != nil {
		return fmt.Errorf("allowed ID: %w", err)
	}
	src, err := source(ctx, endpoint, svidID)
	if err != nil {
		return err
	}
	defer src.Close()
	ln, err := spiffetls.ListenWithMode(ctx, "tcp", addr,
		spiffetls.MTLSServerWithSource(tlsconfig.AuthorizeID(peer), src))
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	defer ln.Close()
	fmt.Println("listening")
	for {
		conn, err := ln.Accept()
		if err != nil {
			return fmt.Errorf("accept: %w", err)
		}
		go echo(conn)
	}
}

func echo(conn net.Conn) {
	defer conn.Close()
	r := bufio.NewReader(conn)
	for {
		line, err := r.ReadString('\n')
		if line != "" {
			if _, werr := io.WriteString(conn, line); werr != nil {
				return
			}
		}
		if err != nil {
			if err != io.EOF {
				fmt.Fprintln(os.Stderr, "connection:", err)
			}
			return
		}
	}
}

func dial(ctx context.Context, endpoint, svidID, addr, serverID, message string) error {
	server, err := spiffeid.FromString(serverID)
	if err != nil {
		return fmt.Errorf("server ID: %w", err)
	}
	src, err := source(ctx, endpoint, svidID)
	if err != nil {
		return err
	}
	defer src.Close()
	conn, err := spiffetls.DialWithMode(ctx, "tcp", addr,
		spiffetls.MTLSClientWithSource(tlsconfig.AuthorizeID(server), src))
	if err != nil {
		return fmt.Errorf("dial %s: %w", addr, err)
	}
	defer conn.Close()
	if err := conn.SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
		return err
	}
	if _, err := io.WriteString(conn, message+"\n"); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return fmt.Errorf("read: %w", err)
	}
	fmt.Print(line)
	return nil
}
