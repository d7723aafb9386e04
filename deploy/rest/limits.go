package main

// What one client can hold: the http.Server's timeouts and header cap, a write deadline that moves with each
// write (so streams live as long as they are read), and a cap on the requests in flight at once.
//
//	read-header-timeout  headers must arrive within it, counted from their first byte (slowloris: cut off)
//	read-timeout         the whole request, headers and body, must arrive within it; once the body is read the
//	                     server clears the read deadline itself, so a long stream is not affected
//	write-timeout        a deadline for each write, not for the whole response: every Write, WriteHeader and
//	                     Flush of the front handler moves the connection's write deadline to now + write-timeout.
//	                     A client that stops reading blocks a write once the socket buffers are full and is cut
//	                     off after write-timeout (the gRPC call is cancelled); a client that reads keeps a stream
//	                     open for as long as generation takes. (Go 1.19 has no http.ResponseController, so the
//	                     handler reaches the net.Conn through http.Server.ConnContext.) The server also sets it
//	                     when a request's headers have been read, which covers what it writes itself.
//	idle-timeout         an idle keep-alive connection is closed
//	max-header-bytes     larger request headers get 431 (from net/http, before any handler runs)
//	max-concurrent-...   requests in flight at once, from the bearer check to the last byte of the response
//	                     (reading the body included: it bounds memory at about max-concurrent x max-body);
//	                     beyond it 503 with Retry-After and an OpenAI error, without reading the body. /health
//	                     is not counted, so probes answer while the sidecar is full.

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"time"
)

type limits struct {
	maxBody           int64
	readHeaderTimeout time.Duration
	readTimeout       time.Duration
	writeTimeout      time.Duration
	idleTimeout       time.Duration
	maxHeaderBytes    int
	maxConcurrent     int
}

func defaultLimits() limits {
	return limits{
		maxBody:           4 << 20,
		readHeaderTimeout: 10 * time.Second,
		readTimeout:       60 * time.Second,
		writeTimeout:      60 * time.Second,
		idleTimeout:       120 * time.Second,
		maxHeaderBytes:    64 << 10,
		maxConcurrent:     256,
	}
}

func (l limits) validate() error {
	switch {
	case l.maxBody <= 0:
		return fmt.Errorf("--max-body-bytes must be > 0")
	case l.readHeaderTimeout < 0 || l.readTimeout < 0 || l.writeTimeout < 0 || l.idleTimeout < 0:
		return fmt.Errorf("timeouts must be >= 0 (0: no limit)")
	case l.maxHeaderBytes <= 0:
		return fmt.Errorf("--max-header-bytes must be > 0")
	case l.maxConcurrent < 0:
		return fmt.Errorf("--max-concurrent-requests must be >= 0 (0: no limit)")
	}
	return nil
}

func (l limits) String() string {
	return fmt.Sprintf("max body %d bytes, read header/read/write/idle timeouts %v/%v/%v/%v, max header %d bytes, "+
		"max %d concurrent requests", l.maxBody, l.readHeaderTimeout, l.readTimeout, l.writeTimeout, l.idleTimeout,
		l.maxHeaderBytes, l.maxConcurrent)
}

type connKey struct{}

// newServer is the sidecar's http.Server (also used by the Go tests, around an httptest listener).
func newServer(handler http.Handler, l limits) *http.Server {
	return &http.Server{
		Handler:           handler,
		ReadHeaderTimeout: l.readHeaderTimeout,
		ReadTimeout:       l.readTimeout,
		WriteTimeout:      l.writeTimeout,
		IdleTimeout:       l.idleTimeout,
		MaxHeaderBytes:    l.maxHeaderBytes,
		// The handler moves the write deadline per write; it needs the connection for that.
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			return context.WithValue(ctx, connKey{}, c)
		},
		ErrorLog: accessLog,
	}
}

func connFrom(ctx context.Context) net.Conn {
	c, _ := ctx.Value(connKey{}).(net.Conn)
	return c
}

// inFlight is a counting semaphore that never waits: a request either gets a slot or is refused.
type inFlight chan struct{}

func newInFlight(n int) inFlight {
	if n <= 0 {
		return nil // no limit
	}
	return make(inFlight, n)
}

func (s inFlight) tryAcquire() bool {
	if s == nil {
		return true
	}
	select {
	case s <- struct{}{}:
		return true
	default:
		return false
	}
}

func (s inFlight) release() {
	if s != nil {
		<-s
	}
}
